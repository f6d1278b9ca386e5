"""MAD's own block types. Importing this package registers them."""

from . import basic, ffn, mlstm, xlstm_v1  # noqa: F401
