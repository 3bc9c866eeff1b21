"""Constants shared by training, export and runtime (pre-processing contract, SPEC §2.1)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB order
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_MULTIPLE = 32  # S must be a multiple of the VGG-16 block-5 stride x 2 (C6 max-pools once more)
L2_EPSILON = 1e-6  # N(.) in prototype correlation, SPEC §2.3
