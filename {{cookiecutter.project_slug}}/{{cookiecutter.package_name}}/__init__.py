"""{{ cookiecutter.__summary | replace('\\', '\\\\') | replace('"', '\\"') | wordwrap(100, break_long_words=False, break_on_hyphens=False) }}"""
