"""Each script once per page.

Jupyter Book 1 runs sphinx-thebe's set-up once per read pass, so its inline configuration
(`const THEBE_JS_URL = ...`) lands twice in every page and the second copy throws a SyntaxError
in the browser. Dropping exact duplicates from the page's script list fixes that and nothing else.
"""


def _unique(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        # an inline script's filename is None in one copy and "" in the other
        key = (str(getattr(script, "filename", script) or ""), tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: the builder renders this very list


def setup(app):
    app.connect("html-page-context", _unique, priority=900)  # after the extensions that add scripts per page
    return {"parallel_read_safe": True, "parallel_write_safe": True}
