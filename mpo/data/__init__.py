"""MMPR preference data: reading, tiling, template + label masks, collation."""
