"""Training and evaluation text: the embedded default corpus, the readers of every supported
source format, packing into byte sequences and the resumable batch streams."""
