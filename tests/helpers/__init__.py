"""What tests share besides fixtures (those stay in conftest.py): import these by name,
``from helpers.store import temporary_store``."""
