"""Imported only if a test trusts plugin_untrusted.yaml: it must never be (the import would fail loudly)."""

raise RuntimeError("corpus_plugin_never_imported was imported without --trust-plugins")
