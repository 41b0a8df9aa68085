"""The local development stack and its installer: not part of the runtime package or image."""
