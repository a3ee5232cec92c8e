"""Independent re-implementations of the method that tests compare the library against.

Nothing here imports the library's method code (probe, backends, pipeline); the library never
imports this package.
"""
