"""Data: TIFF I/O, normalisation, object centres, crops, augmentation, training datasets, synthetic data.

Importing this package (and :mod:`.io`) does not load torch.
"""
