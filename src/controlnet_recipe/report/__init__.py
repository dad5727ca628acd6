"""What people look at: image grids and plots."""
