"""Knowledge bases at work: documents read and indexed in the background, and looked up during calls."""
