"""Launchers render a LaunchSpec into (argv, env) for a real launcher program; they run nothing."""
