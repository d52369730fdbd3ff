"""The focus pyramid (paper §3.1–3.4): defocus PSFs, radius schedules, the views of each scale, alias analysis."""
