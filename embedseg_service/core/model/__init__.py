"""The network (Branched ERF-Net in 2D and 3D), pixel embeddings and the self-contained model file."""
