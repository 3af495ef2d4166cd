"""Scheduling (SPEC §4): which threads become extract jobs, when, and how failures back off."""
