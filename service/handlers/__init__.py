"""Thin engine adapters over :mod:`service.inference`."""
