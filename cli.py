"""Run byteify from a checkout without installing it: ``python cli.py ...`` (also under
``torchrun``).  The installed command is ``byteify`` (or ``python -m byteify``); the app itself is
:mod:`byteify.cli`."""

from byteify.cli import app

if __name__ == "__main__":
    app()
