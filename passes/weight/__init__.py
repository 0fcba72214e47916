"""weight passes."""
