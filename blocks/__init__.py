"""MAD's own block types. Importing this package registers them."""

from . import basic, ffn, mlstm  # noqa: F401
