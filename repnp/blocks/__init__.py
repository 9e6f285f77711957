"""Train and deploy forms of the re-parameterizable block families, one module per family.

See :mod:`repnp.blocks.base` for the protocol every block follows.
"""
