"""First-party backends, each registered under the ``lmkernel.backends`` entry point."""
