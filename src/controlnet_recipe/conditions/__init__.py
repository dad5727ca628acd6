"""Conditions other than faces (Canny edges, ...), behind the same image-in, condition-image-out interface."""
