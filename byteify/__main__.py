"""``python -m byteify ...`` (and ``torchrun ... -m byteify train ...``)."""

from .cli import app

app(prog_name="byteify")
