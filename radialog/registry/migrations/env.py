"""Alembic environment: uses the connection handed over by ``radialog.registry.migrate``."""

from alembic import context

from radialog.registry.models import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    from radialog.registry.db import make_engine

    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("alembic: no connection handed over and no sqlalchemy.url configured")
    with make_engine(url).begin() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
