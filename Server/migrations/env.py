"""Alembic environment: runs on the connection handed over by :func:`dafne_server.storage.migrate`."""

from alembic import context

from dafne_server.db import Base, make_engine

target_metadata = Base.metadata


def _run(connection) -> None:  # noqa: ANN001
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # plain `alembic -x` use: the URL comes from the config
    with make_engine(context.config.get_main_option("sqlalchemy.url")).begin() as conn:
        _run(conn)
