"""edits and reactions: message.edited_at and message.reactions (the per-message summary),
message_edit (every version), message_reaction (one row per message, user, emoji),
message_reaction_event (each add / remove, what a `reaction` sync entry shows) and
sync_entry.ref_id (which edit or reaction event an entry is: a message has several)

Revision ID: 0017
Revises: 0016
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql


revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

TABLE_ARGS = dict(mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci')
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
# Emoji compared byte for byte: utf8mb4_unicode_ci holds many different emoji equal.
EMOJI = sa.String(32).with_variant(mysql.VARCHAR(32, collation='utf8mb4_bin'), 'mysql')


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('edited_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('reactions', sa.JSON(), nullable=True))
    with op.batch_alter_table('sync_entry', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ref_id', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.drop_constraint('uq_sync_entry_user_id_message_id_kind', type_='unique')
        batch_op.create_unique_constraint('uq_sync_entry_user_id_message_id_kind_ref_id',
                                          ['user_id', 'message_id', 'kind', 'ref_id'])
    op.create_table(
        'message_edit',
        sa.Column('id', AUTO_ID, autoincrement=True, nullable=False),
        sa.Column('message_id', sa.BigInteger(), nullable=False),
        sa.Column('editor_id', sa.BigInteger(), nullable=False),
        sa.Column('edited_at', sa.BigInteger(), nullable=False),
        sa.Column('content', sa.Text(), nullable=False),
        sa.Column('previous_content', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_message_edit')),
        **TABLE_ARGS,
    )
    op.create_index('idx_edit_message', 'message_edit', ['message_id', 'id'])
    op.create_table(
        'message_reaction',
        sa.Column('message_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('user_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('emoji', EMOJI, nullable=False),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('message_id', 'user_id', 'emoji', name=op.f('pk_message_reaction')),
        **TABLE_ARGS,
    )
    op.create_table(
        'message_reaction_event',
        sa.Column('id', AUTO_ID, autoincrement=True, nullable=False),
        sa.Column('message_id', sa.BigInteger(), nullable=False),
        sa.Column('user_id', sa.BigInteger(), nullable=False),
        sa.Column('emoji', EMOJI, nullable=False),
        sa.Column('op', sa.String(8), nullable=False),
        sa.Column('at_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_message_reaction_event')),
        **TABLE_ARGS,
    )
    op.create_index('idx_reaction_event_message', 'message_reaction_event', ['message_id'])


def downgrade() -> None:
    op.drop_index('idx_reaction_event_message', table_name='message_reaction_event')
    op.drop_table('message_reaction_event')
    op.drop_table('message_reaction')
    op.drop_index('idx_edit_message', table_name='message_edit')
    op.drop_table('message_edit')
    with op.batch_alter_table('sync_entry', schema=None) as batch_op:
        batch_op.drop_constraint('uq_sync_entry_user_id_message_id_kind_ref_id', type_='unique')
        batch_op.create_unique_constraint('uq_sync_entry_user_id_message_id_kind', ['user_id', 'message_id', 'kind'])
        batch_op.drop_column('ref_id')
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('reactions')
        batch_op.drop_column('edited_at')
