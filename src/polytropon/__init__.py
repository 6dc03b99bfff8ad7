"""polytropon: Poly and MHR adapters."""
