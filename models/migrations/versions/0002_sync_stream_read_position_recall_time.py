"""sync stream, read position, recall time

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sync_entry',
    sa.Column('user_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('message_id', sa.BigInteger(), nullable=False),
    sa.Column('conversation_id', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.SmallInteger(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('user_id', 'seq', name=op.f('pk_sync_entry')),
    sa.UniqueConstraint('user_id', 'message_id', 'kind', name=op.f('uq_sync_entry_user_id_message_id_kind')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    with op.batch_alter_table('sync_entry', schema=None) as batch_op:
        batch_op.create_index('idx_sync_message', ['message_id'], unique=False)

    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_read_msg_id', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recalled_at', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('inbox_seq', sa.BigInteger(), server_default='0', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('inbox_seq')

    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('recalled_at')

    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_column('last_read_msg_id')

    with op.batch_alter_table('sync_entry', schema=None) as batch_op:
        batch_op.drop_index('idx_sync_message')

    op.drop_table('sync_entry')
