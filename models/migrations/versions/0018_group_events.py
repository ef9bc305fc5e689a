"""group events: the group_event table (membership changes, renames, role changes, deletions,
each a sync stream entry of kind 4) and chat_group.deleted_at (a deleted group)

Revision ID: 0018
Revises: 0014
"""
from alembic import op
import sqlalchemy as sa


revision = '0018'
down_revision = '0014'
branch_labels = None
depends_on = None

TABLE_ARGS = dict(mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci')
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('chat_group', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sa.BigInteger(), nullable=True))
    op.create_table(
        'group_event',
        sa.Column('id', AUTO_ID, autoincrement=True, nullable=False),
        sa.Column('group_id', sa.BigInteger(), nullable=False),
        sa.Column('event', sa.String(16), nullable=False),
        sa.Column('actor_id', sa.BigInteger(), nullable=True),
        sa.Column('user_ids', sa.JSON(), nullable=True),
        sa.Column('name', sa.String(100), nullable=True),
        sa.Column('role', sa.String(16), nullable=True),
        sa.Column('timestamp', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_group_event')),
        **TABLE_ARGS,
    )
    op.create_index('idx_group_event_group', 'group_event', ['group_id', 'id'])


def downgrade() -> None:
    op.drop_index('idx_group_event_group', table_name='group_event')
    op.drop_table('group_event')
    with op.batch_alter_table('chat_group', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
