"""Building blocks of the LESA and LIT models that are not models themselves."""
from .deform_conv import DeformConv2dPack
from .deform_merge import DeformableTokenMerging
from .lesa_attention import Lesa
