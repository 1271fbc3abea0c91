"""Quick look at the package: build each registered backbone with ``features_only=True`` and print
the multi-scale feature shapes and strides for one image tensor.

    python -m lesa_lit_models.demo [MODEL ...]
"""
import argparse

import timm
import torch

import lesa_lit_models  # noqa: F401  (registers the models)


def describe(name: str, batch: int = 1) -> None:
    model = timm.create_model(name, features_only=True).eval()
    cfg = model.pretrained_cfg
    _, height, width = cfg['input_size']
    image = torch.randn(batch, 3, height, width)
    with torch.inference_mode():
        features = model(image)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f'{name}: input {tuple(image.shape)}, {params:.2f}M backbone params')
    for feature, stride, module in zip(features, model.feature_info.reduction(), model.feature_info.module_name()):
        print(f'  {module:<10} stride {stride:>2}  {tuple(feature.shape)}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', help='model names (default: the smallest of each family)')
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.models or ['lesa_resnet50', 'lit_ti']:
        describe(name)


if __name__ == '__main__':
    main()
