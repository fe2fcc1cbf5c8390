"""Conversion: a Llama-family source checkpoint (``sources``) -> a BLT model directory.  The
source's decoder layers are transplanted by a declarative tensor map (``tensor_maps/``,
``transplant``), the fresh parts are initialised and streamed (``fresh``, sized by ``presets``),
and the transplant is proven numerically (``verification``)."""
