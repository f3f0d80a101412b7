"""Image and video inputs: loading, checking, and preprocessing into vision-encoder patches."""
