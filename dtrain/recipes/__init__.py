"""Recipes that ship inside dtrain (run as scripts, so they live apart from the runtime modules, whose names
such as logging.py would shadow the standard library in a script's folder)."""
