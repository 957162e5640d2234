"""The cluster front: `cotune route` forwards each call to a worker where its adapter is hot.
Imports no torch."""
