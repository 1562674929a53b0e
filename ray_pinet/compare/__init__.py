"""``ray-pinet compare``: a grid of methods x backbones x seeds on one dataset, and its report."""
