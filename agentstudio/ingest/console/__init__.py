"""The calls console: server-rendered pages under /console/ for people, signed in with an API key."""
