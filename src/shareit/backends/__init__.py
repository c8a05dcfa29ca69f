"""The built-in backends, one module each; imported only when a mapping first uses one.

See :mod:`shareit.registry` for the name -> class table.
"""
