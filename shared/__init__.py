"""cit.

Importing ``shared`` (every entry point does, before torch) makes idle OpenMP threads sleep instead of spin unless
the user chose otherwise: on a CPU shared with other processes, spinning intra-op threads starve them (a 50-image
cache build took 37.6 s spinning and 13.4 s sleeping with two other jobs on 2 cores).  It must be set before torch
loads its OpenMP runtime.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
