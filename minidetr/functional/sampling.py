"""PLACEHOLDER: being written (layers helper)."""
def interpolate_nearest(x, size): raise NotImplementedError
