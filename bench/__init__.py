"""The backup benchmark behind `make bench`: dataset generator, measured variants, report."""
