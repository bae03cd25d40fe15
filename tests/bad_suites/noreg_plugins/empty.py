"""A plugin module without register_methods (the bad-input corpus expects one clear line)."""
