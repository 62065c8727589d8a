"""PLACEHOLDER: being written (functional helper)."""
def reshape(x, shape): raise NotImplementedError
def permute(x, axes): raise NotImplementedError
def transpose(x, a, b): raise NotImplementedError
def flatten(x, start=0, end=-1): raise NotImplementedError
def unsqueeze(x, axis): raise NotImplementedError
def squeeze(x, axis): raise NotImplementedError
def expand(x, shape): raise NotImplementedError
def getitem(x, index): raise NotImplementedError
def gather(x, axis, index): raise NotImplementedError
def concat(tensors, axis=0): raise NotImplementedError
def stack(tensors, axis=0): raise NotImplementedError
def split(x, sizes, axis=0): raise NotImplementedError
