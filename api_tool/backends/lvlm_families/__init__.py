"""One adapter per LVLM family (see ``base.py`` for the contract and ``api_tool.families`` for the table)."""
