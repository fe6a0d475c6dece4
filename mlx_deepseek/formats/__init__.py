"""Chat formats: each family's prompt template and sampling defaults (templates.py)."""
