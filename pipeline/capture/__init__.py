"""Stage 1: rows the teacher expects (data), the teacher (teacher), its targets per position
(targets), and the capture that writes them into a cache on one or many ranks (run)."""
