"""Everything the MedSAM2Slicer module does that needs no Qt: MRML logic, the background worker,
the engine client and the first-use dependency check.

Importing this package (or ``dependencies`` / ``worker``) must work in a Slicer without torch: the
module imports ``logic`` and ``engine_client`` only after the dependency check has passed, because
they import the engine (and so torch).
"""
