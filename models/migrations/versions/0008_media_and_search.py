"""media and search: media (uploads) and media_ref (messages naming them); the message search
index (app.chat.search), message_search with a FULLTEXT index on MySQL, an FTS5 mirror kept by
triggers on SQLite

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa
import sqlalchemy.dialects.mysql


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# SQLite: an external-content FTS5 table over message_search; the triggers keep it in step
# with every insert and delete the application makes (its rowid is the message id).
SQLITE_FTS = [
    "CREATE VIRTUAL TABLE message_search_fts USING fts5(terms, content='message_search', "
    "content_rowid='message_id', tokenize='ascii')",
    "CREATE TRIGGER message_search_ai AFTER INSERT ON message_search BEGIN "
    "INSERT INTO message_search_fts(rowid, terms) VALUES (new.message_id, new.terms); END",
    "CREATE TRIGGER message_search_ad AFTER DELETE ON message_search BEGIN "
    "INSERT INTO message_search_fts(message_search_fts, rowid, terms) VALUES ('delete', old.message_id, old.terms); "
    "END",
    "CREATE TRIGGER message_search_au AFTER UPDATE ON message_search BEGIN "
    "INSERT INTO message_search_fts(message_search_fts, rowid, terms) VALUES ('delete', old.message_id, old.terms); "
    "INSERT INTO message_search_fts(rowid, terms) VALUES (new.message_id, new.terms); END",
]


def upgrade() -> None:
    op.create_table(
        'media',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('uploader_id', sa.BigInteger(), nullable=False),
        sa.Column('sha256', sa.String(64).with_variant(sa.dialects.mysql.VARCHAR(64, collation='utf8mb4_bin'),
                                                       'mysql'), nullable=False),
        sa.Column('content_type', sa.String(100), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('upload_size', sa.BigInteger(), nullable=False),
        sa.Column('filename', sa.String(255), nullable=True),
        sa.Column('width', sa.Integer(), nullable=True),
        sa.Column('height', sa.Integer(), nullable=True),
        sa.Column('has_thumbnail', sa.Boolean(), server_default='0', nullable=False),
        sa.Column('storage_key', sa.String(128), nullable=False),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_media')),
        sa.UniqueConstraint('uploader_id', 'sha256', name=op.f('uq_media_uploader_id_sha256')),
        mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci',
    )
    op.create_index('idx_media_created', 'media', ['created_at_ms'])
    op.create_table(
        'media_ref',
        sa.Column('media_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('message_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint('media_id', 'message_id', name=op.f('pk_media_ref')),
        mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci',
    )
    op.create_index('idx_media_ref_message', 'media_ref', ['message_id'])
    op.create_table(
        'message_search',
        sa.Column('message_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('terms', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('message_id', name=op.f('pk_message_search')),
        mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci',
    )
    if op.get_bind().dialect.name == 'mysql':
        op.create_index('ft_message_search_terms', 'message_search', ['terms'], mysql_prefix='FULLTEXT')
    else:
        for statement in SQLITE_FTS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'mysql':
        for name in ('message_search_au', 'message_search_ad', 'message_search_ai'):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS message_search_fts")
    op.drop_table('message_search')
    op.drop_table('media_ref')
    op.drop_table('media')
