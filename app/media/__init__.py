"""Media: uploaded images and files (app.media.uploads), their content checks (app.media.content)
and where their bytes live (app.media.store)."""
