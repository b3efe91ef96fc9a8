"""Registry backbones of this family (being written; SPECS lists what exists)."""

SPECS: tuple = ()
