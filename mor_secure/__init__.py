"""mor-secure shared library: data, models, privacy. Holds no role logic.

The role packages (`silo_agent`, `coordinator`) import from here; nothing here
imports them (see DESIGN.md section 3).
"""

__version__ = "0.1.0"
