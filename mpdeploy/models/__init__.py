"""Models: the model spec, loading (timm / zoo / files / programs), data and preprocessing."""
