# Sourced by setup_env.sh: which CUDA compiler builds mmcv's CUDA ops.
#
# cuda_toolkit_plan TORCH_CUDA [NVCC] prints one line:
#   "system NVCC"         the given nvcc (on PATH or in CUDA_HOME) is of torch's CUDA major.minor: build with it;
#   "index X.Y"           none is, or it is of another CUDA version: install CUDA X.Y's compiler from the package
#                         index into the virtual environment (only the NVIDIA driver is needed on the machine);
#   "unsupported X.Y"     torch's CUDA has no compiler packages in that layout (before 13): install a CUDA X.Y
#                         toolkit yourself and put its nvcc on PATH.
cuda_version_of() {  # the CUDA major.minor an nvcc reports
  "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p'
}

cuda_toolkit_plan() {
  local torch_cuda=$1 nvcc=${2:-}
  local wanted; wanted="$(echo "$torch_cuda" | cut -d. -f1-2)"
  if [ -n "$nvcc" ] && [ "$(cuda_version_of "$nvcc")" = "$wanted" ]; then
    echo "system $nvcc"
  elif [ "${wanted%%.*}" -ge 13 ] 2>/dev/null; then
    echo "index $wanted"
  else
    echo "unsupported $wanted"
  fi
}

# cuda_link_dir VENV LIB MAJOR: the packages ship libcudart.so.MAJOR in LIB but not the unversioned libcudart.so
# that the link's -lcudart looks for; make it in VENV/cuda-link and print that folder's absolute path (for
# LIBRARY_PATH: the build links from another working directory)
cuda_link_dir() {
  local dir; dir="$(realpath -m "$1/cuda-link")"
  mkdir -p "$dir" && ln -sf "$(realpath -m "$2/libcudart.so.$3")" "$dir/libcudart.so" && echo "$dir"
}

# the package-index toolkit of CUDA X.Y: the packages, and where they install (site-packages/nvidia/cuX)
cuda_toolkit_packages() {
  local version=$1
  echo "nvidia-cuda-nvcc==$version.* nvidia-cuda-cccl==$version.* nvidia-cuda-crt==$version.*" \
    "nvidia-cuda-runtime==$version.* nvidia-nvvm==$version.*"
}
